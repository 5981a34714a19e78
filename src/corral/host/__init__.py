"""What corral asks of the operating system beyond POSIX, one small module per need.

Each module here is the only place its platform-specific calls live (``SO_PEERCRED``,
``/proc``, bubblewrap), so porting corral to another system is writing these files again.
Standard library only: the CLI's client side uses :mod:`corral.host.peercred`.
"""
