package archive

import (
	"encoding/json"
	"fmt"
	"net/url"
	"reflect"
	"strings"

	"cascata/internal/config"
)

// Settings of config.Project (by toml key) that never go into an archive:
// key material and its sources, and instance-local paths.
var settingsLeftOut = map[string]bool{
	"ref":             true, // recorded as project.ref
	"jwt_secret":      true,
	"jwt_secret_env":  true,
	"jwt_secret_file": true,
	"jwks_file":       true,
	"storage_dir":     true,
	// Where the files are is the importing instance's choice.
	"storage_url":       true,
	"s3_endpoint":       true,
	"s3_region":         true,
	"s3_access_key_env": true,
	"s3_secret_key_env": true,
}

// Settings recorded for information only (passwords replaced) and not
// applied by Import, which connects the project to its new server.
var settingsInformative = map[string]bool{
	"database_url": true,
	"owner_url":    true,
	"replica_urls": true,
	// Per-role login URLs reach the old server, and their passwords are
	// not in the archive: the operator sets them up again.
	"role_logins": true,
}

// projectFields walks the toml-tagged fields of config.Project.
func projectFields(p *config.Project, fn func(key string, v reflect.Value)) {
	rv := reflect.ValueOf(p).Elem()
	rt := rv.Type()
	for i := range rt.NumField() {
		f := rt.Field(i)
		key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if key == "" || key == "-" || !f.IsExported() {
			continue
		}
		fn(key, rv.Field(i))
	}
}

// settingsOf records every setting of p by its toml key, so that settings
// added to config.Project later travel without a format change. URLs lose
// their passwords; secrets and local paths are left out.
func settingsOf(p *config.Project) (ProjectSettings, error) {
	s := ProjectSettings{Ref: p.Ref, Settings: map[string]json.RawMessage{}}
	var err error
	projectFields(p, func(key string, v reflect.Value) {
		if err != nil || settingsLeftOut[key] {
			return
		}
		val := v.Interface()
		switch key {
		case "database_url", "owner_url":
			val = config.RedactURL(v.String())
		case "replica_urls":
			var urls []string
			for _, u := range v.Interface().([]string) {
				urls = append(urls, config.RedactURL(u))
			}
			val = urls
		case "role_logins":
			logins := map[string]string{}
			for role, u := range v.Interface().(map[string]string) {
				logins[role] = config.RedactURL(u)
			}
			val = logins
		}
		raw, merr := json.Marshal(val)
		if merr != nil {
			err = fmt.Errorf("setting %s: %w", key, merr)
			return
		}
		s.Settings[key] = raw
	})
	return s, err
}

// applySettings sets p's fields from the recorded settings, skipping the
// informative ones. Settings this build does not know are returned.
func applySettings(p *config.Project, s ProjectSettings) (unknown []string, err error) {
	known := map[string]bool{}
	projectFields(p, func(key string, v reflect.Value) {
		known[key] = true
		raw, ok := s.Settings[key]
		if !ok || err != nil || settingsLeftOut[key] || settingsInformative[key] {
			return
		}
		if uerr := json.Unmarshal(raw, v.Addr().Interface()); uerr != nil {
			err = fmt.Errorf("%w: setting %s: %v", ErrCorrupt, key, uerr)
		}
	})
	for _, k := range sortedKeys(s.Settings) {
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	return unknown, err
}

// projectRoles returns the "roles" setting.
func projectRoles(s ProjectSettings) ([]string, error) {
	raw, ok := s.Settings["roles"]
	if !ok {
		return nil, nil
	}
	var roles []string
	if err := json.Unmarshal(raw, &roles); err != nil {
		return nil, fmt.Errorf("%w: setting roles: %v", ErrCorrupt, err)
	}
	return roles, nil
}

// urlUser is the user name of a postgres URL ("" when there is none).
func urlUser(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.User == nil {
		return ""
	}
	return u.User.Username()
}
