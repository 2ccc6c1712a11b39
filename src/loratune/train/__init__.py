"""train stage of loratune."""
