"""What every stage shares and no stage owns: the one user-facing error type, atomic file
writes (temporary path, then rename; locks, umask, stale temporaries), hashing, human-facing
output (progress lines, markdown tables, PNG figures) and thread settings. It imports nothing
from the rest of the package.
"""
