"""Entry point of the processes the launcher starts: runs the (function, args) pickled on stdin."""

import pickle
import sys

if __name__ == "__main__":
    target, args = pickle.load(sys.stdin.buffer)
    target(*args)
