"""Typed, validated configuration (pydantic) loaded from configs/*.yaml."""
from comeir_dist.config.base import Section, load_yaml, parse_section, validation_message

__all__ = ["Section", "load_yaml", "parse_section", "validation_message"]
