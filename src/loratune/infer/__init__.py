"""infer stage of loratune."""
