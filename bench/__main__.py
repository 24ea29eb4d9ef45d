import os
import sys

from .cli import main

try:
    status = main()
    sys.stdout.flush()
except BrokenPipeError:
    # The reader went away (`python -m bench list | head`): stop quietly, as a tool killed by
    # SIGPIPE does. Python flushes stdout again at exit; pointing it at /dev/null keeps that
    # flush from printing a second BrokenPipeError.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    status = 128 + 13
sys.exit(status)
