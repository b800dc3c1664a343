"""`dflash trainer-agent`: runs the control plane's training jobs on this host's GPUs.

settings.py   its configuration (flags, DFLASH_AGENT_* variables)
client.py     the control plane's agent routes, over HTTP
runner.py     the loop: register, claim, start trainers, heartbeat, ship logs, stop cleanly
"""
