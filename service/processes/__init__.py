"""Worker processes as the server sees them: started, fed tasks, followed and reaped.

What runs inside those processes is `service.worker`; this package never imports it.
"""
