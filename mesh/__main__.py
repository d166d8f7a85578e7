import sys

# A plugin host started by an agent takes the short way (mesh/_run_main.py); everything else,
# and any `mesh run` it does not understand, the full command line.
if sys.argv[1:2] == ["run"]:
    from mesh._run_main import main as _run_main

    code = _run_main(sys.argv[2:])
    if code is not None:
        sys.exit(code)

from mesh.cli import main

main()
