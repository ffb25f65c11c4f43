// gorelay: the reference's way of relaying a blob from a peer, for benchmarks/p2p_blob.py to
// compare spegel's relay against. Every request is forwarded to -upstream (same path and query,
// with X-Spegel-Mirrored: true, as a node asks a peer) and the body copied to the client with
// net/http and io.Copy, as the reference does (-verify=false), or (-verify) teed into SHA-256
// on a goroutine of its own, holding the last 64 KiB back until the digest in the path matches.
// Standard library only, so the benchmark builds it offline.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
)

const heldBack = 64 << 10

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	upstream := flag.String("upstream", "", "base URL of the peer, e.g. http://127.0.0.1:5000")
	verify := flag.Bool("verify", false, "verify the body against the digest in the path")
	flag.Parse()
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	// The benchmark waits for this line, then connects.
	fmt.Printf("listening on %s\n", listener.Addr())
	os.Stdout.Sync()
	log.Fatal(http.Serve(listener, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		request, _ := http.NewRequestWithContext(r.Context(), "GET", *upstream+r.URL.RequestURI(), nil)
		request.Header.Set("X-Spegel-Mirrored", "true")
		response, err := http.DefaultClient.Do(request)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer response.Body.Close()
		w.Header().Set("Content-Length", response.Header.Get("Content-Length"))
		w.WriteHeader(response.StatusCode)
		digest := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
		if !*verify || response.StatusCode != http.StatusOK || response.ContentLength < heldBack {
			io.Copy(w, response.Body)
		} else if err := copyVerified(w, response.Body, response.ContentLength, digest); err != nil {
			log.Print(err)
			panic(http.ErrAbortHandler) // cut the connection: the client must not see a whole body
		}
	})))
}

// copyVerified copies size bytes of body to w while a goroutine of its own hashes them; the last
// heldBack bytes are written only once the digest matches.
func copyVerified(w io.Writer, body io.Reader, size int64, digest string) error {
	const buffers, bufferSize = 4, 256 << 10
	free := make(chan []byte, buffers)
	for i := 0; i < buffers; i++ {
		free <- make([]byte, bufferSize)
	}
	toHash, sum := make(chan []byte, buffers), make(chan string, 1)
	go func() {
		hasher := sha256.New()
		for chunk := range toHash {
			hasher.Write(chunk)
			free <- chunk[:cap(chunk)] // written too by now: the copier takes a buffer only after writing the last
		}
		sum <- "sha256:" + hex.EncodeToString(hasher.Sum(nil))
	}()
	tail := make([]byte, 0, heldBack)
	var copied int64
	for copied < size {
		buffer := <-free
		n, err := body.Read(buffer[:min(int64(len(buffer)), size-copied)])
		if n > 0 {
			chunk := buffer[:n]
			toHash <- chunk
			sendable := min(int64(n), max(0, size-heldBack-copied))
			if _, werr := w.Write(chunk[:sendable]); werr != nil {
				close(toHash)
				return werr
			}
			tail = append(tail, chunk[sendable:]...)
			copied += int64(n)
		}
		if err != nil && copied < size {
			close(toHash)
			return fmt.Errorf("after %d of %d bytes: %w", copied, size, err)
		}
	}
	close(toHash)
	if got := <-sum; got != digest {
		return fmt.Errorf("the body hashes to %s, not %s", got, digest)
	}
	_, err := w.Write(tail)
	return err
}
