"""The state zoo: real training states saved mid-run, restored in a new process, and trained on.

``cases.py`` defines what each case builds and how it trains, ``worker.py`` runs cases in a subprocess,
``compare.py`` diffs two dumped states bitwise, and ``test_zoo.py`` drives it all.
"""
