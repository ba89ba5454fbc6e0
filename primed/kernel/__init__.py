"""The kernel: DRM ioctls named as drm.h names them, and the allocators behind the daemon."""
