"""`python -m s1serve.launch_server --model-path MODEL ...`: the deployment guide's SGLang command line, served by
s1serve (see s1serve.entrypoints.dialects for what each flag becomes)."""

import sys

from s1serve.entrypoints.cli import main_launch_server

if __name__ == "__main__":
    sys.exit(main_launch_server())
