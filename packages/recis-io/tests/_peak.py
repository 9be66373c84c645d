"""The peak resident memory of a child process, as it prints it."""

#: Python source printing this process's peak resident memory in KiB. It reads Linux's VmHWM,
#: this program's own high-water mark: ``ru_maxrss`` carries the forking process's peak over
#: ``exec`` (the test runner's, which may be far larger than the child's and would hide it).
PRINT_PEAK_KIB = """
import resource
try:
    with open("/proc/self/status") as _status:
        _peak = next(int(ln.split()[1]) for ln in _status if ln.startswith("VmHWM:"))
except OSError:
    _peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(_peak)
"""
