"""bookgpt's library: what the scripts at the top of the repository share (README.md, "The files").
Nothing in it imports a script or model.py."""
