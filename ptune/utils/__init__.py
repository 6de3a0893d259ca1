"""Small helpers any package may use: where the repository is, atomic and durable writes, handing freed heap
back to the OS. Imports nothing of ptune."""
