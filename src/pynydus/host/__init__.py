"""Helpers for the host pynydus runs on: start-up checks, mount(2), mountinfo, kernel EROFS mounts, disk usage,
cgroups, writeback, a process's /proc status.

Not the `[system]` config section, which configures the system controller.
"""
