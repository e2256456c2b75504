"""`python -m s1serve.serve.proxy --server-port 8000 ...` runs the proxy without the top-level CLI."""

import sys

from s1serve.serve.proxy.config import main_proxy

sys.exit(main_proxy())
