from fashioncnn.cli import main

main()
