"""``python -m gpuproc ARGS``: runs the ``gpuproc`` command with ARGS."""

from ._cli import main

main()
