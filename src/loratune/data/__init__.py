"""data stage of loratune."""
