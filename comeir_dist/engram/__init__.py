"""comeir_dist.engram: the dual-level Engram memory (sizing, hashing, patterns, tables, read operator).

Only the torch-free pieces are re-exported here, so ``comeir params`` stays fast; import
``comeir_dist.engram.{hashing,patterns,tables,read}`` explicitly for the torch parts.
"""
from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.sizing import TableSpec, format_params_table, inter_params, intra_params, params_report, table_specs

__all__ = ["EngramConfig", "TableSpec", "format_params_table", "inter_params", "intra_params", "params_report", "table_specs"]
