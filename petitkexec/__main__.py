from petitkexec.cli import main

main()
