"""The local lab: file-backed stand-ins for the four systems, plus emulators that speak
their protocols (rental SMTP, RTX CLI over SSH). `layout.py` names every file."""
