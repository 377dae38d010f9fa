"""The command line: `python -m core ...`.

    main.py        the parser and every command
"""
