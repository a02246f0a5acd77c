"""`comeir memory build|evaluate`: Rec2PM preference-memory serving state (comeir_dist/eval/memory_store.py)."""
from __future__ import annotations

import argparse
import json


def add_memory_commands(sub: "argparse._SubParsersAction") -> None:
    from comeir_dist.cli import add_overwrite_flag, command

    p = sub.add_parser("memory", help="preference memory (model.pref_memory): build / evaluate stored user memories")
    msub = p.add_subparsers(dest="memory_cmd", required=True)
    q = msub.add_parser("build", help="compress every user's archive into M (one pass per segment), store it")
    q.add_argument("--checkpoint", required=True, help="checkpoint dir of a pref_memory run (e.g. RUN/best)")
    q.add_argument("--dataset", help="override the dataset dir recorded in the checkpoint")
    q.add_argument("--out", required=True, help="output dir: memories.safetensors + memory.json")
    q.add_argument("--split", default="test", help="valid | test: whose histories are compressed")
    q.add_argument("--batch-size", dest="batch_size", type=int)
    add_overwrite_flag(q)
    q = msub.add_parser("evaluate", help="rank the catalog from stored memories + the recent segment")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--memories", required=True, help="dir written by `comeir memory build`")
    q.add_argument("--out", help="metrics JSON")
    q.add_argument("--beam-size", dest="beam_size", type=int)

    @command("memory")
    def _memory(args) -> int:
        from comeir_dist.eval.memory_store import run_memory_build, run_memory_evaluate

        if args.memory_cmd == "build":
            rep = run_memory_build(args.checkpoint, args.dataset, args.out, args.split, args.batch_size,
                                   overwrite=args.overwrite)
        else:
            rep = run_memory_evaluate(args.checkpoint, args.memories, args.out, args.beam_size)
        print(json.dumps(rep, indent=2))
        return 0
