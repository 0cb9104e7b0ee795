"""How much of a file a process has really read through its memory map (Linux smaps)."""
import os


def mapped_bytes(path):
    """Bytes of ``path`` mapped into this process's memory (its pages touched, not its size)."""
    real, total, current = os.path.realpath(path), 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == real:
                total += int(fields[1]) * 1024
    return total
