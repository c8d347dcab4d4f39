from procrop.cli import main

main()
