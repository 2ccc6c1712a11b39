"""export stage of loratune."""
