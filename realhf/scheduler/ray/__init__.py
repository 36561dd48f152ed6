"""Ray scheduler (``mode=ray``): worker jobs as actors on an existing Ray cluster.

Importing this package does not import ``ray``; the client does, when made.
"""
