"""`loratune ui`: a local web app (Gradio) over the same functions and commands as the CLI.

The UI writes configs and runs `loratune train`, `eval` and `export` as subprocesses in a workspace folder
(so a run outlives a page reload, and is the CLI's run exactly); it reads their run folders back for
progress, curves and samples. Every path goes through `paths.Workspace.resolve`.
"""
