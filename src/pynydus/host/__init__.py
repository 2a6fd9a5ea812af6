"""Helpers for the host pynydus runs on: start-up checks, mount(2), mountinfo, kernel EROFS mounts, disk usage,
cgroups, writeback.

Not the `[system]` config section, which configures the system controller.
"""
