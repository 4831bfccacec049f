"""What every stage shares and no stage owns: the one user-facing error type, atomic file
writes (temporary path, then rename), hashing, and human-facing output (progress bars,
markdown tables, PNG figures). It imports nothing from the rest of the package.
"""
