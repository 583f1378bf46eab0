from segcal.cli import main

main()
