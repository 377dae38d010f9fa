"""Background jobs: the studio's queue and the process that trains.

    queue.py       the job manager the studio shares (one training thread, a queue)
    worker.py      a job's own process: progress, stop requests, several devices
    forkserver.py  the warm process (torch imported once) that forks each job's process on Linux
"""
