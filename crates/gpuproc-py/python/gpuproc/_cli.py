"""Finding and running the ``gpuproc`` command installed with this package.

The wheel installs the native ``gpuproc`` program into the environment's scripts directory
(``bin/``), where the shell finds it; ``python -m gpuproc`` runs the same program.
"""

import os
import sys
import sysconfig


def find_gpuproc_bin() -> str:
    """The path of the ``gpuproc`` command installed with this package.

    Looks in the scripts directory of this interpreter's installation scheme (the
    virtual environment's ``bin/``), then in the user scheme's, then on ``PATH``.
    Raises FileNotFoundError when it is in none of them.
    """
    exe = "gpuproc"
    candidates = [os.path.join(sysconfig.get_path("scripts"), exe)]
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        candidates.append(os.path.join(sysconfig.get_path("scripts", scheme=user_scheme), exe))
    candidates.append(os.path.join(os.path.dirname(sys.executable), exe))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, exe)
        if folder and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "the gpuproc command is not installed next to this Python (looked in "
        + ", ".join(candidates)
        + " and on PATH)"
    )


def main() -> None:
    """Replaces this process with ``gpuproc`` and the arguments after the program name."""
    path = find_gpuproc_bin()
    os.execv(path, [path, *sys.argv[1:]])
