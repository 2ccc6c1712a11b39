"""model stage of loratune."""
