"""The command line: `python -m core ...`.

    main.py      main(): parse, open the workspace once, run the command, print its result (JSON or text)
    parser.py    the parser, each command group registering its sub-commands
    output.py    Output: what a command prints with and without --json, and its exit status; USER_ERRORS
    progress.py  the progress bar a foreground run reports to
    train.py     train, resume, job: a run trained in this process (one device, a launcher, or a rank)
    review.py    evaluate, decide, learning-curve, cam-audit, audit-pack, duplicates
    deploy.py    predict, export, serve, watch
    release.py   golden, release, releases: the golden set and the models that ship
    runs.py      runs, presets
"""
