"""The fixed harness behind the scripts: what happens to a run after train.py, as small modules
that analyze.py's command line calls (see analyze.py's docstring for which module holds what)."""
