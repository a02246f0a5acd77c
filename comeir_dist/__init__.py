"""comeir-dist."""
