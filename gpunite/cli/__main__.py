from gpunite.cli import main

main()
