"""Entry point of the processes the launcher starts: sets up logging, then runs the (function, args) pickled on
stdin."""

import logging
import pickle
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    target, args = pickle.load(sys.stdin.buffer)
    target(*args)
