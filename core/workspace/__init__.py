"""The workspace: its folders, the SQLite index of runs, and files written whole or not at all.

    store.py       Workspace and Run: where a run's files live, the runs table
    files.py       atomic writes (fsynced), and array caches keyed by what they were computed from
"""
