"""The machinery around the reference: safe file reading and writing, downloads, run records, the command line.

The four reference modules (orthcr.py, clip_min.py, data.py, train.py) import from here; nothing here imports
train.py. Read the reference first; come here for how runs are kept safe.
"""
