from chargesim.chaos.cli import main

main()
