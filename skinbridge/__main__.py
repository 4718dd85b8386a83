from skinbridge.cli import main

main()
