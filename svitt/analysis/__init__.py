"""What the workflow draws and tabulates from finished runs: efficiency (edges, FLOPs, memory,
speed), plots (one function per figure), tables (Markdown/CSV) and results (reading result JSONs)."""
