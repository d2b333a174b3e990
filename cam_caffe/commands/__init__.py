"""The ``cam-caffe`` commands, each a module with ``main(argv) -> int``:

- ``run``: ``cam-caffe INPUT… [options]``, maps of images (the default command);
- ``models``: ``cam-caffe models list | download | path``, the model registry;
- ``evaluate``: ``cam-caffe evaluate``, localization error and faithfulness;
- ``export``: ``cam-caffe export``, the net as an ONNX model.

Their shared argument types and options are declared once, in ``options``.
:func:`main` picks the command and turns every failure into one line on
stderr and a documented exit code.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading

from ..errors import EXIT_INTERNAL, CamError, Terminated, one_line
from ..launch import reader_gone, say
from ..signals import deferred, exit_code, ignore_signals

# The first argument names a command module; anything else runs ``run``.
SUBCOMMANDS = ("models", "evaluate", "export")


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and documented exit codes, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = argv[0] if argv and argv[0] in SUBCOMMANDS else "run"
        with deferred():                         # a Ctrl-C during the imports acts after them
            module = importlib.import_module(f"{__name__}.{command}")
        return module.main(argv[1:] if command != "run" else argv)
    except CamError as e:
        say(f"cam-caffe: error: {one_line(str(e))}")
        return e.exit_code
    except KeyboardInterrupt as e:               # Ctrl-C or SIGTERM (Terminated)
        if threading.current_thread() is threading.main_thread():
            ignore_signals()                     # the process is on its way out
        say(f"cam-caffe: {'terminated' if isinstance(e, Terminated) else 'interrupted'}")
        return exit_code(e)
    except BrokenPipeError:
        return reader_gone()
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("CAM_CAFFE_DEBUG"):
            raise
        say(f"cam-caffe: internal error: {type(e).__name__}: {one_line(str(e))} "
            "(set CAM_CAFFE_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL
