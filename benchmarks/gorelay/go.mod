module spegel/benchmarks/gorelay

go 1.22
