"""`python -m bmi_agent`: what the initramfs runs as PID 1."""

from bmi_agent.main import main

main()
