"""kernels stage of loratune."""
