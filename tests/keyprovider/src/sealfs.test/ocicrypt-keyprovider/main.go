// Command ocicrypt-keyprovider drives a keyprovider through ocicrypt itself (the reference
// client): the configuration from OCICRYPT_KEYPROVIDER_CONFIG, the key wrapper ocicrypt uses
// for `provider:` recipients, and the crypto configs its `provider:` encryption and
// decryption keys make.
//
//	ocicrypt-keyprovider wrap NAME[:ARGS]   < data        > provider's annotation
//	ocicrypt-keyprovider unwrap NAME        < annotation  > data
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containers/ocicrypt/config"
	keyproviderconfig "github.com/containers/ocicrypt/config/keyprovider-config"
	"github.com/containers/ocicrypt/keywrap/keyprovider"
)

func run(operation, spec string, input []byte) ([]byte, error) {
	conf, err := keyproviderconfig.GetConfiguration()
	if err != nil {
		return nil, err
	}
	if conf == nil {
		return nil, errors.New(keyproviderconfig.ENVVARNAME + " is not set")
	}
	name := strings.SplitN(spec, ":", 2)[0]
	attrs, ok := conf.KeyProviderConfig[name]
	if !ok {
		return nil, fmt.Errorf("no keyprovider %s in %s", name, os.Getenv(keyproviderconfig.ENVVARNAME))
	}
	wrapper := keyprovider.NewKeyWrapper(name, attrs)
	switch operation {
	case "wrap":
		cc, err := config.EncryptWithKeyProvider([][]byte{[]byte(spec)})
		if err != nil {
			return nil, err
		}
		return wrapper.WrapKeys(cc.EncryptConfig, input)
	case "unwrap":
		cc, err := config.DecryptWithKeyProvider([][]byte{[]byte(spec)})
		if err != nil {
			return nil, err
		}
		return wrapper.UnwrapKey(cc.DecryptConfig, input)
	}
	return nil, fmt.Errorf("unknown operation %q (wrap or unwrap)", operation)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: ocicrypt-keyprovider wrap|unwrap NAME[:ARGS] < input")
		os.Exit(2)
	}
	input, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err == nil {
		var out []byte
		out, err = run(os.Args[1], os.Args[2], input)
		if err == nil && len(out) == 0 {
			err = errors.New("the provider answered nothing")
		}
		if err == nil {
			_, err = os.Stdout.Write(out)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ocicrypt-keyprovider:", err)
		os.Exit(1)
	}
}
