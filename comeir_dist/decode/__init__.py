"""comeir_dist.decode: catalog prefix tree and constrained beam search over semantic IDs."""

from comeir_dist.decode.beam import BeamResult, StepFn, beam_search, masked_log_softmax
from comeir_dist.decode.trie import PrefixTrie

__all__ = ["PrefixTrie", "BeamResult", "StepFn", "beam_search", "masked_log_softmax"]
