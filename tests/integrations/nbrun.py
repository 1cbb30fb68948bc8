"""Run a notebook in a real Jupyter kernel of *this* interpreter, as a user's notebook runs.

`python nbrun.py SPEC.json` reads {"cells": [source, ...], "cwd": dir, "timeout": seconds,
"interrupt": {"cell": index, "when_exists": path}} (interrupt optional: once that cell has made
the file `path`, the kernel is interrupted as Jupyter's stop button does), executes the cells in
order with nbclient, one kernel for all of them, and prints one JSON line:
{"outputs": [[{"name": stream, "text": ...} | {"error": ename}, ...] per cell], "versions": {...}}.
A cell that raises does not stop the next ones (a user runs on, too).

It is a script, not a module of the test package: the tests run it with the python of whichever
kernel environment they test (ipykernel 6 / IPython 8, ipykernel 7 / IPython 9), where nbclient
and ipykernel are installed; the kernel it starts is that python (a kernelspec written here).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any


def _kernelspec(root: str) -> str:
    """A kernelspec that starts this very interpreter, whatever else is installed."""
    name = "safe-redirect-test"
    folder = os.path.join(root, "kernels", name)
    os.makedirs(folder)
    with open(os.path.join(folder, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"],
                   "display_name": "safe_redirect test", "language": "python"}, f)
    os.environ["JUPYTER_PATH"] = root
    return name


def _interrupt(client: Any) -> None:
    """What `KernelManager.interrupt_kernel` does for a local kernel (SIGINT to its process
    group), from a thread: nbclient's manager is async and runs in nbclient's own loop."""
    provisioner = client.km.provisioner
    if getattr(provisioner, "pgid", None):
        os.killpg(provisioner.pgid, signal.SIGINT)
    else:
        os.kill(provisioner.process.pid, signal.SIGINT)


def _interrupt_when(client: Any, path: str, stop: threading.Event) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            if os.path.exists(path):
                _interrupt(client)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def main(spec_path: str) -> None:
    import ipykernel
    import IPython
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    with open(spec_path) as f:
        spec = json.load(f)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in spec["cells"]]
    interrupt = spec.get("interrupt")
    with tempfile.TemporaryDirectory() as root:
        client = NotebookClient(nb, kernel_name=_kernelspec(root), timeout=spec["timeout"],
                                resources={"metadata": {"path": spec["cwd"]}},
                                allow_errors=True)
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                stop = threading.Event()
                if interrupt and interrupt["cell"] == index:
                    _interrupt_when(client, interrupt["when_exists"], stop)
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError:
                    pass
                finally:
                    stop.set()
    outputs = []
    for cell in nb.cells:
        shown = []
        for out in cell.outputs:
            if out.output_type == "stream":
                shown.append({"name": out.name, "text": out.text})
            elif out.output_type == "error":
                shown.append({"error": out.ename, "value": out.evalue})
        outputs.append(shown)
    print(json.dumps({"outputs": outputs,
                      "versions": {"ipykernel": ipykernel.__version__,
                                   "IPython": IPython.__version__}}))


if __name__ == "__main__":
    main(sys.argv[1])
